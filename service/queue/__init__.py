"""The work queue between the API and the worker: messages carry operation seqs only."""
from service.queue.base import Message, OperationQueue
from service.queue.local import LocalQueue
from service.queue.redis_streams import RedisStreamQueue

__all__ = ["LocalQueue", "Message", "OperationQueue", "RedisStreamQueue"]

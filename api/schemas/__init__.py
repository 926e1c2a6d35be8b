"""Pydantic request/response bodies of the API, one module per group of routes."""

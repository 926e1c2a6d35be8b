from knowpatch.cli import main

raise SystemExit(main())

from watcherd.cli import main

raise SystemExit(main())

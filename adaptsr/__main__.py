from adaptsr.cli import main

raise SystemExit(main())

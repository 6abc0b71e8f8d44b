from moesim.cli import main

raise SystemExit(main())

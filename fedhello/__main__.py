from fedhello.cli import main

raise SystemExit(main())

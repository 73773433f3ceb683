from vaegan.cli import main

raise SystemExit(main())

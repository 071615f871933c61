"""``python -m moe_routing.report``."""

from .execute import main

raise SystemExit(main())

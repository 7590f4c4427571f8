"""``python -m compute_agent.virt.qemu build|list``: the guest image catalogue's command line.

It lives here rather than behind ``python -m compute_agent.virt.qemu.image`` because running a
module of a package that its ``__init__`` already imported runs it twice (runpy warns).
"""

from compute_agent.virt.qemu.image import main

raise SystemExit(main())

"""Exit codes of the ``aslbatch`` command, in one place (README and ``--help`` list them)."""

#: success: every requested session done or up to date; no problem found (validate)
EXIT_OK = 0
#: some sessions failed, the others are done (run); problems found (validate)
EXIT_FAILED = 1
#: usage or configuration error
EXIT_USAGE = 2
#: nothing found to process
EXIT_NOTHING = 3
#: another run holds the output folder's lock
EXIT_LOCKED = 4

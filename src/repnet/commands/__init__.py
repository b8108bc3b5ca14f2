"""One module per ``repnet`` command: each has ``HELP``, ``configure(parser)`` and ``run(args) -> int``.

Command modules import only what building the parser needs (``argparse``, :mod:`repnet.config`,
:mod:`repnet.keyvalue`): the workflows, and with them torch, are imported when a command runs,
so ``repnet --help`` and ``repnet list`` start fast.
"""

#: The commands, in the order ``repnet --help`` lists them.
COMMANDS = ("list", "profile", "plan", "train", "demo", "reproduce", "continual", "federated", "export", "proviot")

"""The CLI's subcommands, one module each (``register(subparsers)`` and a handler);
the handlers import the library inside functions, so ``captioner --help`` stays light."""

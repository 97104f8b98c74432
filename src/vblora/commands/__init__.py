"""Subcommands of the `vblora` CLI: one module per subcommand, discovered automatically.

Each module defines `register(subparsers)` which adds its parser(s) and sets `func` on them;
`func(args) -> int` runs the command. Modules must import heavy dependencies lazily (inside
`func`), so `vblora --help` stays fast and works with torch alone.
"""

"""Registry of subcommands, in the order `--help` lists them."""

from diffcli.cli import cmd_apply, cmd_inspect, cmd_prune

COMMANDS = [
    ("prune", cmd_prune.prune),
    ("inspect", cmd_inspect.inspect),
    ("apply", cmd_apply.apply),
]

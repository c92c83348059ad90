"""Registry of subcommands, in the order `--help` lists them."""

from diffcli.cli import cmd_apply, cmd_inspect, cmd_prune

from diffcli.cli import cmd_train  # noqa: E402

COMMANDS = [
    ("train", cmd_train.train),
    ("prune", cmd_prune.prune),
    ("inspect", cmd_inspect.inspect),
    ("apply", cmd_apply.apply),
]

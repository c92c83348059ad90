"""Registry of subcommands, in the order `--help` lists them: name, module, function (imported when built)."""

COMMANDS = [
    ("train", "diffcli.cli.cmd_train", "train"),
    ("prune", "diffcli.cli.cmd_prune", "prune"),
    ("pack", "diffcli.cli.cmd_pack", "pack"),
    ("verify", "diffcli.cli.cmd_verify", "verify"),
    ("inspect", "diffcli.cli.cmd_inspect", "inspect"),
    ("apply", "diffcli.cli.cmd_apply", "apply"),
    ("eval", "diffcli.cli.cmd_eval", "eval_"),
    ("merge", "diffcli.cli.cmd_merge", "merge"),
]


def names() -> list[str]:
    return [name for name, _, _ in COMMANDS]

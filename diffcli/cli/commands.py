"""Registry of subcommands, in the order `--help` lists them."""

from diffcli.cli import cmd_apply, cmd_eval, cmd_inspect, cmd_merge, cmd_pack, cmd_prune, cmd_verify

from diffcli.cli import cmd_train  # noqa: E402

COMMANDS = [
    ("train", cmd_train.train),
    ("prune", cmd_prune.prune),
    ("pack", cmd_pack.pack),
    ("verify", cmd_verify.verify),
    ("inspect", cmd_inspect.inspect),
    ("apply", cmd_apply.apply),
    ("eval", cmd_eval.eval_),
    ("merge", cmd_merge.merge),
]

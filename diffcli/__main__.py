"""Allow `python -m diffcli`."""

from diffcli.cli.app import main

if __name__ == "__main__":
    main()

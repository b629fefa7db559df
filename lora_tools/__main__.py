"""``python -m lora_tools`` runs the CLI."""

from lora_tools.cli import main

if __name__ == "__main__":
    main()

"""The `kvcompile` command group: a thin layer over the stage functions."""
import click


@click.group()
def main() -> None:
    """kvcompile: compile the KV cache of an LLM."""


if __name__ == "__main__":
    main()

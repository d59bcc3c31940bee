"""What builds the manual beside the Markdown in ``docs/``: the MkDocs hook that writes the
OpenAPI reference from the app's own schema, and the script that makes the README's pictures."""

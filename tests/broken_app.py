"""An app module that fails while importing (for the CLI's error-path test)."""

raise RuntimeError("this module is broken on purpose")

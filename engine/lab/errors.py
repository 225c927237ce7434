"""User-facing error types.

Every error a user can cause (bad file, bad prompt, incompatible checkpoint, impossible config) is raised as a
`CrystallabError` subclass whose message names the input and says what to do. The CLI prints the message and
exits with status 2; the dashboard shows it with `st.error`. Anything else is a bug and keeps its traceback.
"""


class CrystallabError(Exception):
    """Base class: an error caused by user input, with a message meant to be read by that user."""


class InputError(CrystallabError):
    """A file, CIF, archive or dataset the user supplied cannot be used."""


class ConfigError(CrystallabError):
    """A configuration key or value is unknown or impossible."""


class CheckpointError(CrystallabError):
    """A checkpoint cannot be loaded or does not fit the vocabulary / model shapes."""


class PromptError(CrystallabError):
    """A sampling prompt (composition, Z, space group) cannot be expressed in the CrystaLLM vocabulary."""


class PathNotAllowed(CrystallabError):
    """A path lies outside the folders the lab is configured to read and write."""

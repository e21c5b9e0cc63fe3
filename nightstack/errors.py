"""Exceptions that carry a message meant for the user."""


class NightstackError(Exception):
    """A problem the user can act on; its message names the file or setting at fault."""


class FrameError(NightstackError):
    """One frame cannot be used; the night goes on without it.

    ``path`` names the frame, ``reason`` says what is wrong in a few words.
    """

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

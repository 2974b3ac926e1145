"""The one exception type for mistakes a user can fix; the CLI prints it as one line, no traceback.

It lives at the top of the data flow (activations) so every later package can raise it without
importing anything downstream.
"""


class UserError(Exception):
    """A problem caused by the user's input. The message names the problem and the fix."""

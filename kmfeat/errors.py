"""User-facing errors: one line that says what to fix; the CLI exits with status 2."""


class KmfeatError(Exception):
    """A mistake the user can fix (bad input, bad parameter, missing file).

    The message must be one line naming the file or parameter and what was expected.
    """

    exit_code = 2

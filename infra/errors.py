"""The one base of the failures tunedex reports to a person: the CLI prints the message (which names the thing
and the fix) as one line and exits with `exit_code`, never a traceback. Each module keeps its own subclass."""


class TunedexError(Exception):
    exit_code = 1

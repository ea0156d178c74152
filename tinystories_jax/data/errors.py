"""The one exception type for problems a user can cause in the data path."""


class DataError(Exception):
  """A problem with the user's input or output paths, stated in one sentence with its fix.

  Entry points print the message and exit with a non-zero status instead of a traceback.
  """

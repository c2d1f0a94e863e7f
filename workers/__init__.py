"""Where the model meets the streams: the worker loop and the command line."""

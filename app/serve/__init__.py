"""`imgrec serve`: the process around the app: settings, and uvicorn with the lame-duck drain
and the connection limits."""

"""latentgen's HTTP server: AUTOMATIC1111's API and a web page over one queue (`python -m latentgen.serve`)."""

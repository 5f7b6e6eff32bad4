"""The HTTP API's routers, one module per thing served: the web page, probes, predictions,
contributions, the labelling queue and keys. :func:`cellclass.serving.app.create_app` includes them in that order."""

"""``captioner serve``: a captioning web service (FastAPI + uvicorn, the ``serve`` extra).

* :mod:`captioner.serve.engine` — the model: decoded images in, captions and attention out,
  one batch at a time (no web code);
* :mod:`captioner.serve.batcher` — an asyncio queue that gathers the images of concurrent
  requests into batches for one model thread;
* :mod:`captioner.serve.uploads` — request options and uploaded files, checked and decoded;
* :mod:`captioner.serve.app` — the FastAPI application: JSON API, the page, error answers.

FastAPI is imported only inside :func:`captioner.serve.app.create_app`, so importing this
package (and ``captioner --help``) stays light.
"""

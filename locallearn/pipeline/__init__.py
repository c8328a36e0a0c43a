"""``mode=pipeline``: every chunk in its own process, all training at once.

* :mod:`~locallearn.pipeline.strategy`: rank 0's execution strategy (drives the others from the LightningModule);
* :mod:`~locallearn.pipeline.worker`: the worker processes, one chunk each;
* :mod:`~locallearn.pipeline.link`: the messages between them;
* :mod:`~locallearn.pipeline.limits`: what a pipeline cannot run, and the device of each chunk.
"""

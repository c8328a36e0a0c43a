"""Train a transformer cut into locally trained chunks.

    python run.py                      # defaults: the induction task, model=small, chunks=4
    python run.py chunks=4 mode=sequential data=shakespeare
    python run.py -m chunks=1,2,4      # a multirun; chunks=1 is end-to-end backprop
"""

from locallearn.main import entry

if __name__ == "__main__":
    entry()

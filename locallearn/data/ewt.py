"""LM data from the raw sentences of UD English EWT (in-domain text for the UD probes), in the run's tokenizer."""

from pathlib import Path

from locallearn.data.conllu import read_conllu
from locallearn.data.text import TextCorpus, read_text
from locallearn.errors import ConfigError

SEPARATOR = "\n"  # joins sentences in the training stream; probe extraction joins its sentences the same way
SPLITS = ("train", "dev", "test")


def ewt_file(root, split: str) -> Path:
    return Path(root).expanduser() / f"en_ewt-ud-{split}.conllu"


def join_sentences(texts: list[str]) -> str:
    """The character stream of a list of sentences: each one followed by the separator."""
    return "".join(t + SEPARATOR for t in texts)


class EWTDataModule(TextCorpus):
    """The ``# text =`` lines of EWT train (training), dev (validation) and test (test), joined by ``SEPARATOR``.

    The alphabet is every character of the three splits, so probing a model trained here on any EWT split
    never meets an unknown character.
    """

    name = "ewt"

    def __init__(self, path, batch_size: int, block_size: int, test_path=None, **kwargs):
        kwargs["name"] = kwargs.get("name") or "en_ewt"
        super().__init__(batch_size, block_size, **kwargs)
        self.path = Path(path).expanduser()
        missing = [str(ewt_file(self.path, s)) for s in SPLITS if not ewt_file(self.path, s).is_file()]
        if missing:
            raise ConfigError(f"data.path={self.path} lacks {', '.join(missing)}; point data.path at the "
                              f"ud-english-ewt folder holding en_ewt-ud-{{train,dev,test}}.conllu.")
        texts = {s: join_sentences([x.text for x in read_conllu(ewt_file(self.path, s))]) for s in SPLITS}
        self.sources = {"train": [ewt_file(self.path, "train")], "val": [ewt_file(self.path, "dev")],
                        "test": [ewt_file(self.path, "test")]}
        test = texts["test"]
        if test_path is not None:  # another test text than the treebank's own
            test, self.sources["test"] = read_text(test_path, "data.test_path")
        self.set_texts(texts["train"], texts["dev"], test, f"data.path={self.path}", alphabet=texts["test"])

from .sasrec import SASRec, SASRecConfig

__all__ = ["SASRec", "SASRecConfig"]

"""Model registry: every model is selectable by name in the run config (``model: sasrec``)."""

from __future__ import annotations

from genrec.data.info import DatasetInfo
from genrec.models.base import RecModel
from genrec.models.bprmf import BPRMF, BPRMFConfig
from genrec.models.dcnv2 import DCNv2, DCNv2Config
from genrec.models.deepfm import DeepFM, DeepFMConfig
from genrec.models.dfgr import DFGR, DFGRConfig
from genrec.models.dien import DIEN, DIENConfig
from genrec.models.din import DIN, DINConfig
from genrec.models.gdcn import GDCN, GDCNConfig
from genrec.models.genrank import GenRank, GenRankConfig
from genrec.models.gru4rec import GRU4Rec, GRU4RecConfig
from genrec.models.hstu import HSTU, HSTUConfig
from genrec.models.narm import NARM, NARMConfig
from genrec.models.sasrec import SASRec, SASRecConfig
from genrec.models.sfgr import SFGR, SFGRConfig
from genrec.models.unigrf import UniGRF, UniGRFConfig
from genrec.settings import build_dataclass

MODELS: dict[str, tuple[type[RecModel], type]] = {
    "sasrec": (SASRec, SASRecConfig),
    "hstu": (HSTU, HSTUConfig),
    "genrank": (GenRank, GenRankConfig),
    "dfgr": (DFGR, DFGRConfig),
    "sfgr": (SFGR, SFGRConfig),
    "unigrf": (UniGRF, UniGRFConfig),
    "gru4rec": (GRU4Rec, GRU4RecConfig),
    "narm": (NARM, NARMConfig),
    "bprmf": (BPRMF, BPRMFConfig),
    "din": (DIN, DINConfig),
    "dien": (DIEN, DIENConfig),
    "dcnv2": (DCNv2, DCNv2Config),
    "deepfm": (DeepFM, DeepFMConfig),
    "gdcn": (GDCN, GDCNConfig),
}


def build_model(name: str, args: dict, info: DatasetInfo, max_len: int) -> RecModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    cls, cfg_cls = MODELS[name]
    args = dict(args)
    if "max_len" in cfg_cls.__dataclass_fields__:
        # One source of truth: the data's max_len sizes the position tables and sets HSTU's attention
        # scale (genrec.nn.hstu.attention_scale), so a second value could only disagree silently.
        if args.get("max_len", max_len) != max_len:
            raise ValueError(f"model_args.max_len={args['max_len']} differs from data.max_len={max_len}; the model "
                             "takes max_len from the data (position tables, attention scale): drop model_args.max_len")
        args["max_len"] = max_len
    return cls(build_dataclass(cfg_cls, args, f"model {name}", "model_args"), info)

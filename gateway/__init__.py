"""esl-gateway: a multi-process FreeSWITCH outbound Event Socket gateway with hot restart."""

__version__ = "0.1.0"

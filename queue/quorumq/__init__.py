"""quorumq: the quorum queue (DESIGN.md section 3).

Groups of 3 independent log servers; a batch commits when 2 servers of a group have it
durably; consumers read 2 servers of every group, merge by message id and deliver each
committed message in per-producer order.
"""

from quorumq.consumer import Consumer, Delivery
from quorumq.exactly_once import ExactlyOnce
from quorumq.producer import (
    AsyncProducer,
    Committed,
    Producer,
    PublishFailed,
    PublishNotFound,
    PublishTimeout,
    PublishUnavailable,
    Unacknowledged,
)

__all__ = ["AsyncProducer", "Committed", "Consumer", "Delivery", "ExactlyOnce", "Producer",
           "PublishFailed", "PublishNotFound", "PublishTimeout", "PublishUnavailable",
           "Unacknowledged"]

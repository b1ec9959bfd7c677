"""One exception tree for the whole package.

Every error a user can cause carries a message that names the problem and
the fix, so the command line can print it as one line and exit with code 2.

    ConsortiumError
    ├── ConfigError                 a configuration value is malformed or out of range
    │   └── UnknownDatasetError     a dataset name that is not built in
    ├── DataError                   a site's data cannot be used as declared
    │   ├── SchemaError             a schema file or a CSV row breaks the schema
    │   ├── SchemaMismatchError     two sites declare different schemas
    │   └── PartitionError          the data cannot be split as asked
    ├── ModelError                  a model or parameter vector does not fit its layout
    ├── ProtocolError               a message broke the protocol
    │   ├── MessageRejected         bytes that do not parse as a known message
    │   └── RoundFailed             a round could not complete (too few sites answered)
    └── VerificationError           a proof, signature or record does not check out
"""

from __future__ import annotations


class ConsortiumError(Exception):
    """Base class of every error raised on purpose by Consortium."""


class ConfigError(ConsortiumError, ValueError):
    """A configuration value is malformed or out of range."""


class UnknownDatasetError(ConfigError):
    """A dataset name that Consortium does not ship."""


class DataError(ConsortiumError, ValueError):
    """A site's data cannot be used as declared."""


class SchemaError(DataError):
    """A schema file is malformed, or a CSV row breaks its schema."""


class SchemaMismatchError(DataError):
    """Two sites declare schemas that cannot train one model."""


class PartitionError(DataError):
    """The data cannot be split across sites as asked."""


class ModelError(ConsortiumError, ValueError):
    """A model, or a parameter vector, does not match its declared layout."""


class ProtocolError(ConsortiumError):
    """A message broke the protocol: malformed, unsealed, replayed, or not the stage's; it is refused."""


class MessageRejected(ProtocolError):
    """Bytes that do not parse as a message of the closed, versioned schema."""


class RoundFailed(ProtocolError):
    """A round could not complete, for example because too few sites answered."""


class VerificationError(ConsortiumError):
    """A proof, a signature or a recorded figure does not check out: the record cannot be trusted."""

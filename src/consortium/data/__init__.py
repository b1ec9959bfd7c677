"""Data for Consortium: tables, built-in and synthetic datasets, partitions and site CSVs.

- :mod:`consortium.data.datasets`: the :class:`Table` every site trains on, the
  built-in datasets and the synthetic hospitals with heterogeneity knobs.
- :mod:`consortium.data.partition`: split one table across simulated sites
  (IID, label skew, quantity skew) and a site's table into train/validation/test.
- :mod:`consortium.data.schema`: read a real site's CSV against a declared schema
  (category columns, missing values, a class or regression label), and check that
  all sites declare the same one; ``docs/schema.md`` documents the format.
- :mod:`consortium.data.infer`: draft a schema from a CSV (``consortium schema infer``).
- :mod:`consortium.data.stream`: a :class:`StreamedTable` reads a site's records from a map-style
  ``torch.utils.data.Dataset`` a batch at a time, for data larger than memory; :data:`Records` is
  either kind, what every site-side step reads through.
- :mod:`consortium.data.images`: images of any size from a folder of PNG/JPEG files or a ``.npy`` array
  (Pillow is loaded only when an image is read).
"""

from consortium.data.datasets import (
    BUILTIN_DATASETS,
    SyntheticHospitals,
    Table,
    load_builtin,
    synthetic_hospitals,
)
from consortium.data.images import load_image_array, load_image_folder, synthetic_images, write_image_folder
from consortium.data.infer import infer_schema
from consortium.data.stream import Records, StreamedTable
from consortium.data.partition import (
    Splits,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    split_table,
)
from consortium.data.schema import (
    ColumnSpec,
    DataSchema,
    check_schemas,
    layout_table,
    load_schema,
    read_csv,
    schema_of,
    write_csv,
    write_schema,
)

__all__ = [
    "BUILTIN_DATASETS",
    "ColumnSpec",
    "DataSchema",
    "Records",
    "Splits",
    "StreamedTable",
    "SyntheticHospitals",
    "Table",
    "check_schemas",
    "infer_schema",
    "layout_table",
    "load_builtin",
    "load_image_array",
    "load_image_folder",
    "load_schema",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity",
    "read_csv",
    "schema_of",
    "split_table",
    "synthetic_images",
    "synthetic_hospitals",
    "write_csv",
    "write_image_folder",
    "write_schema",
]

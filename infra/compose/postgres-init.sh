#!/bin/sh
# Runs once, on the first start of the postgres container (docker-entrypoint-initdb.d):
# one database per service; Prefect's server needs the pg_trgm extension.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
\c prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL

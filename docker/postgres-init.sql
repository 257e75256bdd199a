-- Run once, when the postgres service initialises its volume: MLflow's database beside the
-- Optuna study's (POSTGRES_DB). Both keep an Alembic version table, so they need one each.
CREATE DATABASE mlflow;

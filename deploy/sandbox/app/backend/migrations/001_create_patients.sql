-- Applied by `python3 /app/app.py migrate` inside one transaction.
CREATE TABLE IF NOT EXISTS patients (
    id          bigserial PRIMARY KEY,
    mrn         text NOT NULL UNIQUE,          -- medical record number
    full_name   text NOT NULL,
    birth_date  date,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS patients_full_name_idx ON patients (full_name);

-- Applied by `python3 /app/app.py migrate` inside one transaction.
-- One row per POST /api/echo: the sample backend answers 200 only once its INSERT committed.
CREATE TABLE IF NOT EXISTS requests (
    id          bigserial PRIMARY KEY,
    service     text NOT NULL,
    build       text NOT NULL,
    host        text NOT NULL,
    path        text NOT NULL,
    body_bytes  integer NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);

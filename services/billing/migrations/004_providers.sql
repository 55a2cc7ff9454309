-- Upstream providers (routstr-core's field names) and the operator's per-provider model overrides.
-- `source` says who manages a row: the providers file (PROVIDERS_PATH, re-applied at every start),
-- the UPSTREAM_BASE_URL shorthand, or the admin API.
CREATE TABLE billing.providers (
    id                bigserial PRIMARY KEY,
    slug              text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    provider_type     text NOT NULL
                      CHECK (provider_type IN ('openai', 'anthropic', 'openrouter', 'ollama', 'vllm', 'generic')),
    base_url          text NOT NULL,
    api_key           text NOT NULL DEFAULT '',   -- the key itself, or '' when api_key_env names it
    api_key_env       text NOT NULL DEFAULT '',   -- the environment variable holding the key
    api_version       text,
    provider_fee      numeric CHECK (provider_fee > 0),  -- NULL: UPSTREAM_PROVIDER_FEE
    priority          integer NOT NULL DEFAULT 0,
    enabled           boolean NOT NULL DEFAULT true,
    models            text[],                     -- only these model ids are sold; NULL = all it lists
    provider_settings jsonb NOT NULL DEFAULT '{}',
    source            text NOT NULL DEFAULT 'admin' CHECK (source IN ('file', 'env', 'admin')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- A model as routstr-core and OpenRouter write it ({id, name, pricing, alias_ids, enabled,
-- forwarded_model_id, context_length, ...}); overrides what the provider lists for that id.
CREATE TABLE billing.provider_models (
    provider_id bigint NOT NULL REFERENCES billing.providers (id) ON DELETE CASCADE,
    model_id    text NOT NULL,
    model       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_id, model_id)
);

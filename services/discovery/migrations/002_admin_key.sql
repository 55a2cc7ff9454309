-- A key the operator set through the admin API (PATCH /admin/api/nsec) wins over NSEC and over a
-- generated key, so it survives restarts; clearing it deletes the row (back to NSEC or a new key).
ALTER TABLE discovery.node_key ADD COLUMN set_by_admin boolean NOT NULL DEFAULT false;

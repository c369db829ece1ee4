-- The encrypted child pair of a rotation is kept only for `refresh_reuse_interval`, then erased
-- (refresh tokens at rest are hashes only). This index finds the rows still holding one.
CREATE INDEX refresh_tokens_child ON refresh_tokens (rotated_at_ms) WHERE child_cipher IS NOT NULL;

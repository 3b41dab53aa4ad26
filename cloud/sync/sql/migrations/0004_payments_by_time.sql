-- A device's payments by when the cloud received them (issue 14): what a rollout reads
-- to tell whether a device still approves sales after a change. Add only.
CREATE INDEX sync_messages_payments ON sync_messages (device_id, received_at)
    WHERE topic = 'payment';

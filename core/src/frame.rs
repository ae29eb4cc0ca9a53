//! The checksummed frame both the registry's snapshot file and its API
//! backups are written in: a magic, the metadata length (u64 BE), the
//! metadata, the data length (u64 BE), the data, and a CRC-32 of
//! everything before it (u32 BE). `meshctl` checks a downloaded backup with
//! the same code the server restores it with.

/// Frames `meta` and `data` behind `magic`: lengths, bodies and a CRC-32
/// of everything before it. Also the layout of API backups
/// (`GET /v1/snapshot`), under their own magic.
pub fn encode_frame(magic: &[u8], meta: &[u8], data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(magic.len() + 16 + meta.len() + data.len() + 4);
    body.extend_from_slice(magic);
    body.extend_from_slice(&(meta.len() as u64).to_be_bytes());
    body.extend_from_slice(meta);
    body.extend_from_slice(&(data.len() as u64).to_be_bytes());
    body.extend_from_slice(data);
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_be_bytes());
    body
}

/// The (meta, data) of a frame written by [`encode_frame`] with the same
/// magic; says what is wrong otherwise (wrong magic, truncated, checksum).
pub fn decode_frame(magic: &[u8], bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), &'static str> {
    if bytes.len() < magic.len() || &bytes[..magic.len()] != magic {
        return Err("not a snapshot of this kind (bad magic)");
    }
    if bytes.len() < magic.len() + 8 + 8 + 4 {
        return Err("truncated");
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let mut at = magic.len();
    let mut take = || -> Option<Vec<u8>> {
        let mut len = [0u8; 8];
        len.copy_from_slice(body.get(at..at + 8)?);
        let len = usize::try_from(u64::from_be_bytes(len)).ok()?;
        at += 8;
        let part = body.get(at..at.checked_add(len)?)?;
        at += len;
        Some(part.to_vec())
    };
    let parts = take().zip(take());
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(crc);
    // A short file shows as a length past the end (or a checksum mismatch).
    match parts {
        _ if crc32fast::hash(body) != u32::from_be_bytes(crc_bytes) => Err(if parts.is_none() {
            "truncated"
        } else {
            "checksum mismatch"
        }),
        None => Err("truncated"),
        Some(_) if at != body.len() => Err("trailing bytes after the data"),
        Some(parts) => Ok(parts),
    }
}

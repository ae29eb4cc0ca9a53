//! `meshwork-sidecar`: the agent and proxy that runs next to each service.
//! Not built yet: see the issue tracker (sidecar agent and data plane).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("meshwork-sidecar is not implemented yet; the registry is usable on its own")
}

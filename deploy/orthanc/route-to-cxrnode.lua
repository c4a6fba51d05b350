-- Orthanc auto-routing rule for cxrnode: forward each stored chest radiograph to the node.
--
-- Install: copy next to orthanc.json and list it under "LuaScripts"; the node must be the
-- DicomModalities entry named below. Check it after a restart: Orthanc's log prints
-- "cxrnode routing rule loaded".
--
-- What is routed: CR and DX objects, and films stored as Secondary Capture whose Modality
-- is CR or DX (e.g. NIH ChestX-ray14 in the NHS COVID-19 Chest Imaging Database). The node
-- itself decides which of them to analyse (frontal chest films; laterals and other body parts
-- are acknowledged and discarded with a reason), so this rule stays simple and never needs to
-- know about views or body parts.
--
-- What is never routed: what the node sends back (its SEG, SR and Secondary Capture). They
-- are recognised both by who sent them (the node's AE title) and by what they say they are
-- (Manufacturer "cxrnode"), so the rule is loop-free even if the node's AE title changes.
-- The node would drop them anyway, but a rule that does not send them costs nothing.

local NODE_MODALITY = 'cxrnode'     -- the node's name in "DicomModalities"
local NODE_AET = 'CXRNODE'          -- the node's AE title ([node] ae_title)
local ROUTED_MODALITIES = { CR = true, DX = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin ~= nil and origin['RemoteAet'] == NODE_AET then
    return  -- the node's own results
  end
  if tags['Manufacturer'] == 'cxrnode' then
    return  -- the node's own results, forwarded by someone else
  end
  if not ROUTED_MODALITIES[tags['Modality'] or ''] then
    return  -- CT, MR, reports, SEG, presentation states, ...
  end
  SendToModality(instanceId, NODE_MODALITY)
end

print('cxrnode routing rule loaded')

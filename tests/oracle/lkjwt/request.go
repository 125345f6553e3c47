// Package lkjwt reads lk-jwt-service token requests the way lk-jwt-service 0.5.0 does, with
// Go's own encoding/json, and derives the LiveKit names it issues. Written from the service's
// documented request shapes, errors and hashes; the oracle (tests/oracle) and the
// lk-jwt-service stand-in (tests/lkstack) both read requests through it.
//
// The model:
//
//   - The body is read whole; each decoding attempt runs json.NewDecoder over it with
//     DisallowUnknownFields() and one Decode into a fresh struct. Decode reads the first JSON
//     value only; whatever follows it is never looked at.
//   - /get_token decodes the new shape. /sfu/get decodes the legacy shape and, only when that
//     decoding returns an error, the new shape (lk-jwt-service 0.4.0 to 0.5.0; LegacyOnly
//     models later releases). A body that decodes as the legacy shape is judged as legacy (it
//     holds no new-shape key, so the new shape would miss room_id too).
//   - openid_token and member are struct values, not pointers: a JSON null leaves them as
//     they are (as it does every other field), a repeated object merges into them.
//   - expires_in and delay_timeout are int64, which is Go's int on the 64-bit platforms
//     lk-jwt-service ships for.
//   - Required, non-empty: legacy: room, openid_token.access_token,
//     openid_token.matrix_server_name, device_id; new: room_id, slot_id,
//     openid_token.access_token, openid_token.matrix_server_name, member.id,
//     member.claimed_user_id, member.claimed_device_id. Missing ones give 400 M_BAD_JSON.
//   - token_type, expires_in and the delay_* fields are optional, and only type-checked (no
//     rule ties the three delay_* fields together).
//   - slot is "m.call#ROOM" for the legacy shape. Alias = b64std_nopad(sha256(json.Marshal(
//     [room, slot]))); the new shape's identity = b64std_nopad(sha256(json.Marshal([user,
//     claimed_device_id, member.id]))) for the user the OpenID check verified; the legacy
//     identity is "<verified user>:<device_id>".
package lkjwt

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
)

// LegacySlot is the slot of every legacy-shape request.
const LegacySlot = "m.call#ROOM"

type OpenIDToken struct {
	AccessToken      string `json:"access_token"`
	TokenType        string `json:"token_type"`
	MatrixServerName string `json:"matrix_server_name"`
	ExpiresIn        int64  `json:"expires_in"`
}

type Member struct {
	ID              string `json:"id"`
	ClaimedUserID   string `json:"claimed_user_id"`
	ClaimedDeviceID string `json:"claimed_device_id"`
}

// LegacyRequest is the /sfu/get shape.
type LegacyRequest struct {
	Room          string      `json:"room"`
	OpenIDToken   OpenIDToken `json:"openid_token"`
	DeviceID      string      `json:"device_id"`
	DelayID       string      `json:"delay_id"`
	DelayTimeout  int64       `json:"delay_timeout"`
	DelayCSAPIURL string      `json:"delay_cs_api_url"`
}

// NewRequest is the /get_token shape (also taken by /sfu/get up to 0.5.0).
type NewRequest struct {
	RoomID        string      `json:"room_id"`
	SlotID        string      `json:"slot_id"`
	OpenIDToken   OpenIDToken `json:"openid_token"`
	Member        Member      `json:"member"`
	DelayID       string      `json:"delay_id"`
	DelayTimeout  int64       `json:"delay_timeout"`
	DelayCSAPIURL string      `json:"delay_cs_api_url"`
}

// Request is what an accepted body asks for, whichever shape it came in.
type Request struct {
	Shape  string // "legacy" or "new"
	Room   string
	Slot   string
	Device string // legacy device_id, or new member.claimed_device_id
	// New shape only.
	MemberID      string
	ClaimedUserID string
	OpenID        OpenIDToken
}

// Alias is the LiveKit room lk-jwt-service 0.4.3+ names for the request.
func (r *Request) Alias() string {
	return HashOfStrings(r.Room, r.Slot)
}

// Identity is the LiveKit identity issued to `user`, the user the OpenID check verified.
func (r *Request) Identity(user string) string {
	if r.Shape == "legacy" {
		return user + ":" + r.Device
	}
	return HashOfStrings(user, r.Device, r.MemberID)
}

// Refusal is a 400 the service answers instead of a token.
type Refusal struct {
	Errcode string // M_NOT_JSON or M_BAD_JSON
	Message string
}

func (e *Refusal) Error() string { return e.Errcode + ": " + e.Message }

func refuse(errcode, format string, args ...any) *Refusal {
	return &Refusal{Errcode: errcode, Message: fmt.Sprintf(format, args...)}
}

func decode(body []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// HashOfStrings is b64std_nopad(sha256(json.Marshal(items))).
func HashOfStrings(items ...string) string {
	marshalled, err := json.Marshal(items)
	if err != nil {
		panic(err) // a []string always marshals
	}
	sum := sha256.Sum256(marshalled)
	return base64.RawStdEncoding.EncodeToString(sum[:])
}

func fromLegacy(r *LegacyRequest) (*Request, *Refusal) {
	if r.Room == "" {
		return nil, refuse("M_BAD_JSON", "missing room")
	}
	if r.OpenIDToken.AccessToken == "" || r.OpenIDToken.MatrixServerName == "" {
		return nil, refuse("M_BAD_JSON", "missing OpenID token parameters")
	}
	if r.DeviceID == "" {
		return nil, refuse("M_BAD_JSON", "missing device_id")
	}
	return &Request{Shape: "legacy", Room: r.Room, Slot: LegacySlot, Device: r.DeviceID,
		OpenID: r.OpenIDToken}, nil
}

func fromNew(r *NewRequest) (*Request, *Refusal) {
	if r.RoomID == "" || r.SlotID == "" {
		return nil, refuse("M_BAD_JSON", "missing room_id or slot_id")
	}
	if r.OpenIDToken.AccessToken == "" || r.OpenIDToken.MatrixServerName == "" {
		return nil, refuse("M_BAD_JSON", "missing OpenID token parameters")
	}
	m := r.Member
	if m.ID == "" || m.ClaimedUserID == "" || m.ClaimedDeviceID == "" {
		return nil, refuse("M_BAD_JSON", "member is missing id, claimed_user_id or claimed_device_id")
	}
	return &Request{Shape: "new", Room: r.RoomID, Slot: r.SlotID, Device: m.ClaimedDeviceID,
		MemberID: m.ID, ClaimedUserID: m.ClaimedUserID, OpenID: r.OpenIDToken}, nil
}

// Read decodes a body sent to endpoint ("/sfu/get" or "/get_token"). legacyOnly makes
// /sfu/get take the legacy shape only, as lk-jwt-service after 0.5.0 does.
func Read(endpoint string, body []byte, legacyOnly bool) (*Request, *Refusal) {
	switch endpoint {
	case "/get_token":
		var r NewRequest
		if err := decode(body, &r); err != nil {
			return nil, refuse("M_NOT_JSON", "%v", err)
		}
		return fromNew(&r)
	case "/sfu/get":
		var legacy LegacyRequest
		legacyErr := decode(body, &legacy)
		if legacyErr == nil {
			return fromLegacy(&legacy)
		}
		if legacyOnly {
			return nil, refuse("M_NOT_JSON", "%v", legacyErr)
		}
		var r NewRequest
		if err := decode(body, &r); err != nil {
			// 0.5.0 answers a body neither shape decodes as malformed, not as "not JSON".
			return nil, refuse("M_BAD_JSON", "legacy: %v; new: %v", legacyErr, err)
		}
		return fromNew(&r)
	default:
		return nil, refuse("M_NOT_JSON", "unknown endpoint %q", endpoint)
	}
}
